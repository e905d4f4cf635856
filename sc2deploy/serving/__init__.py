"""The gRPC completion service (sc2deploy/v1/completion.proto) over any runtime.

  protos/   the .proto (proto root: package sc2deploy.v1 at sc2deploy/v1/completion.proto)
  v1/       its generated Python code, checked in (codegen.py regenerates it)
  wire.py   lenient request parsing: invalid UTF-8 becomes INVALID_ARGUMENT
  jobs.py   request -> prompt ids, sampling parameters, stop tokens (every validation rule)
  scheduler.py  continuous batching: one engine thread owns the runtime
  server.py the servicer, health, reflection, TLS, limits, graceful stop
  auth.py   API keys; metrics.py Prometheus; client.py the client `sc2deploy complete` uses
  logs.py   text or JSON log lines; request ids (x-request-id)
"""
