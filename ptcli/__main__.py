from ptcli.cli.app import main

main()
