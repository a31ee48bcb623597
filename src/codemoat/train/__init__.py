"""codemoat.train: the vendor's training path — tokenizer, model, data, loop, export.

`codemoat vendor train` calls `trainer.train(TrainOptions(...))`. torch and tokenizers are
imported inside the modules that need them; importing this package is cheap.
"""
