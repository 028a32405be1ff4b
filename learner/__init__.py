"""instructloop.learner: the background learner (SFT, reward model, PPO).

Consumes the prompts and feedback streams and publishes new policy versions. May import
instructloop (contracts) and the training stack; never instructloop.serve.
"""
