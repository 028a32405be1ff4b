"""instructloop.serve: the gRPC inference server.

Owns the public gRPC service (servicer), request validation (validation), the engine
seam over vLLM (engine), prompt/feedback logging to Redis (logstore), metrics and the
server process (app). May import instructloop (contracts) and vLLM; never the learner.
"""
