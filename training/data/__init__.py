"""Small default text corpora of the PPO run (JSONL): a package so that wheels ship them."""
