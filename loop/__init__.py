"""The whole loop on one machine: `instructloop up` and `instructloop simulate`.

- up.py        starts the embedded Redis, the server and the learner as child processes
               and stops them in order (learner, server, Redis) on Ctrl-C or SIGTERM.
- simulate.py  a population of simulated users that drives a running loop through the
               public gRPC API (Generate, SubmitFeedback, GetModel) and the Admin API
               (ListVersions), and measures each served version against v0.
- tasks.py     the default task set: short instruction prompts with a known answer.
- labelers.py  the labeler interface `(prompt, samples) -> ranking`, the shipped labelers,
               populations and their win rates.
- adversaries.py  what adversarial simulated users do.
- evaluate.py, capability.py, measure.py
               the measures of a version: exact-match, the alignment tax (loss on
               held-out pretraining text), the counting probe, and simulate's measuring.
- report.py    report.json and the PNG plot of a simulation; ablate's table and figure.
- ablate.py    `instructloop ablate`: every algorithm on one recorded dataset, offline.

May import: instructloop's shared contracts and clients (instructloop.clients). Must not
import server internals (instructloop.serve). simulate takes from the learner only the
pure user-split function, so that it holds out exactly the users the learner holds out;
ablate alone runs the learner's trainers (SFT, RM, learner/algorithms.py), offline, on
a recorded dataset.
"""
