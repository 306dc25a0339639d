from instraug.cli import main

main()
