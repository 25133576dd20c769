"""`latentdiff serve`: AUTOMATIC1111's HTTP API (/sdapi/v1/...) and a web page, over one worker thread.

schema.py maps A1111's JSON to GenerationRequest and back, checkpoints.py lists the model folder,
worker.py runs jobs one at a time with a bounded queue, app.py holds the routes, static/ the page.
FastAPI and uvicorn are imported only here (the `serve` extra); `import latentdiff` does not need them.
"""
