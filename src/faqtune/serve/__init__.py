"""`faqtune serve` and `faqtune serve-config`: the OpenAI-compatible server and its backends.

app.py (routes, limits, SSE) over http.py (errors, hosts, keys); jobs.py (what a request becomes, shared by
both backends); engine.py (in-process: one base + every adapter, one batching worker); upstream.py (an
OpenAI-compatible engine generates); index_watch.py (a rebuilt index is reloaded); launch.py (the command
that starts vLLM or llama.cpp for `--backend`); static/ (the chat page).
"""
