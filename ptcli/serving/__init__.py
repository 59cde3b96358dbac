"""`ptcli serve`: the frozen base loaded once, every tag of the bank served over HTTP.

`server.py` holds the Starlette app, its endpoints and the run loop; `openai_api.py` what the
endpoints accept and return (OpenAI completions, ptcli rows), checked field by field;
`chat.py` OpenAI chat completions (the base's chat template renders the messages);
`http_io.py` reading a body and waiting for its rows' answers; `metrics.py` the Prometheus
`/metrics` (one registry per server); `batcher.py` the queue and the one worker thread that
answers rows in mixed-tag batches; `live_bank.py` the bank as a running server sees it,
re-listed on every request. Rows are answered by `inference.engine`, the same path
`ptcli infer` takes, so the server answers as the CLI does. It may import api, inference and
every folder below; starlette, uvicorn and
prometheus_client are imported only here.
"""
