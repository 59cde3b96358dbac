"""Rows on disk and as tokens.

`jsonl.py` reads and validates JSON Lines (every problem as `file:line: message`);
`template.py` parses a template and lays a row out by it (prompt vectors as negative ids);
`encode.py` tokenizes text and answer apart, cuts long texts, and finds a task's closed
answer set. No torch here. It may import only the root modules.
"""
