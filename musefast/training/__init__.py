"""Training the demo model with Muse's objectives: the T5 text encoder (:mod:`.text`), the
VQGAN tokenizer (:mod:`.vqgan`), the base masked transformer (:mod:`.transformer`), and the
whole run behind ``musefast train-demo`` (:mod:`.demo`)."""
