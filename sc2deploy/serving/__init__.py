"""The completion service over any runtime: gRPC (sc2deploy/v1/completion.proto) and HTTP beside it.

  protos/   the .proto (proto root: package sc2deploy.v1 at sc2deploy/v1/completion.proto)
  v1/       its generated Python code, checked in (codegen.py regenerates it)
  wire.py   lenient request parsing: invalid UTF-8 becomes INVALID_ARGUMENT
  jobs.py   request -> prompt ids, sampling parameters, stop tokens (every validation rule)
  scheduler.py  continuous batching: one engine thread owns the runtime
  frontend.py  what both front ends do with a request: build its job, submit it, follow it, count it
  server.py the gRPC servicer, health, reflection, TLS, limits, graceful stop; owns the HTTP server
  http_api.py  the HTTP server (Starlette on uvicorn): routes, keys, body limits, errors, streaming
  openai_api.py, infill.py  OpenAI's /v1/completions and llama.cpp's /infill: requests and responses
  json_body.py  strict JSON request bodies: every bad field a 400 naming it
  auth.py   API keys; metrics.py Prometheus; client.py the client `sc2deploy complete` uses
  logs.py   text or JSON log lines; request ids (x-request-id)
"""
