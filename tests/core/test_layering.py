"""The dependency layers hold: import-linter's contracts (pyproject.toml) are
kept, the decision core imports with torch, vLLM, Triton and numpy absent,
and a contract of the same form does catch a core module that imports one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import vllm_esp.core

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter's own dependency
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
#: The torch- and vLLM-free promise of vllm_esp.core (with the rest of the
#: core-pure contract's list).
MUST_BLOCK = {"torch", "vllm", "triton", "numpy"}


def contracts() -> list[dict[str, Any]]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["tool"]["importlinter"]["contracts"]


def core_pure() -> dict[str, Any]:
    (contract,) = [c for c in contracts() if c["id"] == "core-pure"]
    return contract


def lint_imports(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_import_contract_is_kept() -> None:
    result = lint_imports(REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    flat = " ".join(output.split())  # long contract names wrap
    names = [c["name"] for c in contracts()]
    assert len(names) >= 5
    for name in names:
        assert f"{name} KEPT" in flat, f"contract not kept: {name}\n{output}"
    assert f"Contracts: {len(names)} kept, 0 broken." in flat, output


def core_modules() -> list[str]:
    root = Path(vllm_esp.core.__file__).parent
    modules = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent.parent).with_suffix("").parts
        modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


_IMPORT_WITH_BLOCKED = textwrap.dedent("""
    import importlib, json, sys
    blocked, modules, torch_user = json.loads(sys.argv[1])
    for name in blocked:
        sys.modules[name] = None  # "import name" now raises ImportError
    for module in modules:
        importlib.import_module(module)
    try:
        importlib.import_module(torch_user)
    except ImportError:
        pass
    else:
        sys.exit(f"{torch_user} imported although torch is blocked")
""")


def test_core_imports_without_torch_vllm_triton_numpy() -> None:
    blocked = sorted(set(core_pure()["forbidden_modules"]) | MUST_BLOCK)
    modules = core_modules()
    assert {
        "vllm_esp.core.costmodel",
        "vllm_esp.core.mlfq.skip_join",
        "vllm_esp.core.swap.book",
        "vllm_esp.core.esp.step_plan",
    } <= set(modules)
    # The control: a kernels module does need torch, so blocking is effective.
    payload = json.dumps([blocked, modules, "vllm_esp.kernels.swap_copy"])
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_WITH_BLOCKED, payload],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_core_module_importing_a_forbidden_one_breaks_the_contract(tmp_path: Path) -> None:
    forbidden = core_pure()["forbidden_modules"]
    package = tmp_path / "fakepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    config = {
        "root_packages": ["fakepkg"],
        "include_external_packages": True,
        "contracts": [
            {
                "id": "core-pure",
                "name": "fake core is pure",
                "type": "forbidden",
                "source_modules": ["fakepkg.core"],
                "forbidden_modules": forbidden,
            }
        ],
    }
    lines = ["[tool.importlinter]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in config.items() if k != "contracts"]
    for contract in config["contracts"]:
        lines.append("[[tool.importlinter.contracts]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in contract.items()]
    (tmp_path / "pyproject.toml").write_text("\n".join(lines) + "\n")

    (package / "core.py").write_text("import json\n")
    kept = lint_imports(tmp_path)
    assert kept.returncode == 0 and "fake core is pure KEPT" in kept.stdout, (
        kept.stdout + kept.stderr
    )

    (package / "core.py").write_text(f"import {forbidden[0]}\n")
    broken = lint_imports(tmp_path)
    assert broken.returncode != 0, broken.stdout + broken.stderr
    assert "fake core is pure BROKEN" in broken.stdout, broken.stdout + broken.stderr
    assert f"fakepkg.core -> {forbidden[0]}" in broken.stdout
