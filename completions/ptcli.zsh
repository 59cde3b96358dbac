
#compdef ptcli

_ptcli_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _PTCLI_COMPLETE=complete_zsh ptcli)
}

compdef _ptcli_completion ptcli

