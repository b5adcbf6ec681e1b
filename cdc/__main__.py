if __name__ == "__main__":
    from cdc.cli import main

    main()
