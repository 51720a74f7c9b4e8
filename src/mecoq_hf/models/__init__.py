"""Model families of mecoq-hf; `models/mecoq/` is MeCoQ's transformers closure."""
