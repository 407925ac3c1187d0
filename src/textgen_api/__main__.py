from textgen_api.app import main

main()
