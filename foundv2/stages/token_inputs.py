"""What a stage that reads token batches needs of the tokenizer that made them: its code vectors.

Kept apart from :mod:`foundv2.stages.base` so that stages reading no tokens (stage 1, the
tokenizer) do not have the tokenizer's modules in their code closure: the pipeline reruns a
step when code it imports changes.
"""

from __future__ import annotations

import torch

from data_modules.schema import DataError


def load_code_vectors(tokenizer_dir) -> torch.Tensor:
    """[vocab_size, code_dim] the code vector of every global token id of a tokenizer folder
    (the tokenizer's ``export_dir``, :func:`foundv2.nn.sequence.code_vectors`); a DataError
    naming the folder when it cannot be loaded."""
    from foundv2.nn.mrqvae import MultiViewRQVAE
    from foundv2.nn.sequence import code_vectors

    try:
        return code_vectors(MultiViewRQVAE.from_pretrained(tokenizer_dir))
    except DataError:  # a damaged export: its message names the file and the fix
        raise
    except Exception as err:  # safetensors / json raise several kinds on a damaged folder
        raise DataError(f"{tokenizer_dir}: the tokenizer folder cannot be loaded ({type(err).__name__}: "
                        f"{err}); pass the tokenizer's export_dir.") from err


def tokens_code_vectors(stage: str, datamodule, tokenizer_dir, why: str) -> torch.Tensor:
    """The code vectors (:func:`load_code_vectors`) of the tokenizer that made the DataModule's
    tokens dataset, for a stage that reads token batches: a DataError when the data gives no
    tokens dataset, no ``tokenizer_dir`` is set, or the two disagree on the vocabulary."""
    if datamodule.batch_kind != "tokens":
        raise DataError(f"{stage} reads token batches: set data.tokens_dir to a tokens dataset "
                        "(the tokenizer's predict output).")
    if not tokenizer_dir:
        raise DataError(f"{stage} needs model.tokenizer_dir (the tokenizer folder that made "
                        f"{datamodule.hparams.tokens_dir}) to {why} from the code vectors.")
    vectors = load_code_vectors(tokenizer_dir)
    vocab = int((datamodule.input_meta or {})["vocab_size"])
    if vectors.shape[0] != vocab:
        raise DataError(f"{tokenizer_dir}: a tokenizer of {vectors.shape[0]} tokens, but the tokens dataset "
                        f"{datamodule.hparams.tokens_dir} has a vocabulary of {vocab}: give the tokenizer that made it.")
    return vectors
