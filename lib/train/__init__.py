"""Training on fastai's Learner: fit, callbacks, plain-torch DDP, the embedding export."""
