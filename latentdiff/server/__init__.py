"""`latentdiff serve`: AUTOMATIC1111's HTTP API (/sdapi/v1/...) and a web page, over one worker thread.

schema.py maps A1111's JSON to GenerationRequest and back, checkpoints.py lists the model folder,
worker.py runs jobs one at a time with a bounded queue, app.py holds the routes, static/ the page,
command.py the `serve` flags and start-up.
FastAPI and uvicorn (the `serve` extra) are imported by app.py and by command.py when serving, never by
`import latentdiff` or the other commands.
"""
