if __name__ == "__main__":  # not when the writer process (spawn) imports this as __mp_main__
    from cdc.cli import main

    main()
