from meshsl.cli import main

main()
