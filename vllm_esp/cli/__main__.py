from vllm_esp.cli.main import main

if __name__ == "__main__":
    main()
