"""opd-lab: a Hydra-configured research framework for on-policy distillation (OPD) of language models.

Tensor names carry their shape as suffixes: ``logp_B_T`` is [batch, response positions], ``topk_ids_B_T_K`` adds
the K support ids, ``input_ids_B_L`` spans prompt + response (L = P + T). Symbols follow docs/methods.md.
Importing the package imports neither vLLM nor transformers.
"""

__version__ = "0.1.0"
