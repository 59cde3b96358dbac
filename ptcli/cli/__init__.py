"""The faces of ptcli: parse flags, call one typed function, render the result.

`app.py` holds the core commands (init, add-task, tune, infer) and the app itself;
`bank.py` the bank's (list-tags, show, remove-tag, rename-tag, export, import);
`check.py`, `serve.py` and `embed.py` one command each. `options.py` holds the option types, tag
completion and the error handler that turns ptcli's errors into exit codes; `console.py`
is the only writer: data to stdout as JSON, messages for people through Rich on stderr.
Only this folder imports typer or Rich's console, and nothing imports it. It may import
every folder below it. A new flag of `tune`/`add-task` is a field of `config.TaskConfig`
(its option is derived here); a new command is a function here that calls `api` or a
folder's entry point and renders what it returns.
"""
