from yuyan.cli import main

main()
