"""Launched by tests/test_training.py under `accelerate launch --multi_gpu --num_processes 2` on the CPU.

Trains a small model on real Fashion-MNIST images and writes, per rank, a digest of the parameters and the
code memory so the test can check that both processes hold identical state. 92 images are not a multiple of
the global batch of 16, so `even_batches` pads each epoch's last step with 4 repeated images; the memory
pointer (advancing by the codes written) shows how many codes reached the memory.
"""

import hashlib
import json
import sys
import warnings
from pathlib import Path

from mecoq_hf import MeCoQConfig
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.training import TrainingArguments, build_accelerator, train

output_dir = Path(sys.argv[1])
warnings.simplefilter("ignore")
images = load_fashion_mnist("test", limit=92)
config = MeCoQConfig(
    backbone="test_efficientnet",
    backbone_weights=None,
    image_size=32,
    embedding_dim=16,
    num_codebooks=2,
    codebook_size=16,
    memory_size=32,
    memory_start_epoch=1,
)
args = TrainingArguments(
    output_dir=str(output_dir),
    num_epochs=3,
    batch_size=8,
    learning_rate=0.05,
    log_every_steps=1,
    progress_bar=False,
    report_to=[],
    seed=0,
    memory_pointer="actual",
)
accelerator = build_accelerator(args)
result = train(config, args, images, accelerator=accelerator)
state = {k: v for k, v in result.model.state_dict().items()}
digest = hashlib.sha256()
for key in sorted(state):
    digest.update(key.encode() + state[key].detach().cpu().contiguous().numpy().tobytes())
record = {
    "rank": accelerator.process_index,
    "num_processes": accelerator.num_processes,
    "digest": digest.hexdigest(),
    "memory_filled": result.model.memory.num_filled,
    "memory_sum": float(result.model.memory.codes.sum()),
    "memory_pointer": int(result.model.memory.pointer),
}
(output_dir / f"rank_{accelerator.process_index}.json").write_text(json.dumps(record))
