"""`job plan` and the `auto` settings of `job run`: estimate (pure arithmetic, all that `job run` needs), inputs
(architecture, token counts and tokenizer, read from wherever the model and data are) and report (prices, the
recommendation and the printed table)."""
