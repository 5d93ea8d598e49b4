from morer1.cli import main

main()
