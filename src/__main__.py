from lmkiln.cli import main

main()
