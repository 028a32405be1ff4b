"""instructloop.learner: the background learner (SFT, reward model, PPO).

Consumes the prompts and feedback streams and publishes new policy versions; one process,
or one per device under torchrun (distributed.py: rank 0 consumes and publishes). May import
instructloop (contracts) and the training stack; never instructloop.serve.
"""
