"""Local, deterministic byte-level BPE tokenizer trained on ShareGPT text.

The result is saved as a ``PreTrainedTokenizerFast`` folder
(``tokenizer.json``, ``tokenizer_config.json``, chat template) that both
transformers and vLLM load with ``AutoTokenizer``.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from vllm_esp.data.sharegpt import iter_training_text

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "save_tokenizer",
    "train_bpe",
]

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Order fixes the ids: <s>=0, </s>=1, <pad>=2, then the role markers.
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS)

# Minimal role-tagged template. It emits the BOS itself because vLLM's chat
# path tokenizes the rendered prompt with add_special_tokens=False. Content
# may arrive as a list of OpenAI "parts"; only text parts are kept.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_bpe(vocab_size: int, train_chars: int) -> Tokenizer:
    """Train a byte-level BPE on the first ``train_chars`` characters of
    ShareGPT message text.

    Byte-level means every byte has a token, so any string encodes without
    ``<unk>``. Encoding prepends ``<s>`` (as Llama tokenizers do), which
    vLLM relies on when it tokenizes plain-text prompts.

    Determinism: the input is a fixed, ordered text stream and the BPE
    trainer breaks count ties by pair id, so repeated trainings give
    identical merges; ``tests/tools/test_tiny_model.py`` checks this.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError("vocab_size must cover the 256 byte tokens plus the special tokens")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a prompt cut in the middle and re-encoded
    # should not sprout a leading space token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_training_text(train_chars), trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """Wrap ``tok`` in a ``PreTrainedTokenizerFast`` with bos/eos/pad and the
    chat template, and save it into ``out_dir``."""
    # transformers is imported lazily: it takes seconds and only building
    # needs it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))
