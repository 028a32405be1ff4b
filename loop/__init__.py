"""The whole loop on one machine: `instructloop up` and `instructloop simulate`.

- up.py        starts the embedded Redis, the server and the learner as child processes
               and stops them in order (learner, server, Redis) on Ctrl-C or SIGTERM.
- simulate.py  a population of simulated users that drives a running loop through the
               public gRPC API (Generate, SubmitFeedback, GetModel) and the Admin API
               (ListVersions), and measures each served version against v0.
- tasks.py     the default task set: short instruction prompts with a known answer.
- labelers.py  the labeler interface `(prompt, samples) -> ranking` and the shipped labelers.
- report.py    report.json and the PNG plot at the end of a simulation.

May import: instructloop's shared contracts and clients (instructloop.clients). Must not
import server internals (instructloop.serve) or training code; the one thing it takes
from the learner is the pure user-split function, so that the simulator holds out
exactly the users the learner holds out.
"""
