"""instructloop: the InstructGPT recipe as a live service.

This package holds what the server and the learner share, and nothing else: the wire
and record formats (v1, generated from proto/), the Redis key layout (keys), the
embedded Redis (redis_embedded), the default base model (pretrain: pretrained here on a
generated corpus), the random-init model builder (tinymodel) and the command line entry
point (cli). The server lives in instructloop.serve (folder serve/),
the learner in instructloop.learner (learner/), the client SDK in instructloop.clients
(clients/). serve never imports learner, and learner never imports serve.
"""

__version__ = "0.1.0"
