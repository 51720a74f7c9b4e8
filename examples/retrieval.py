# ##################################################################################################
# Image retrieval with a trained MeCoQ model: index a dataset, then search it with one image.
#
# Loads a model folder (the output of `examples/train_fashion_mnist.py` or `mecoq train`), hard-codes every
# database image into M bytes, stores the codes in a `CodeIndex`, and ranks the database for one query image
# by asymmetric scores (the query's embedding against the codewords). Nothing is trained here.
#
#   python examples/retrieval.py runs/fashion-mnist --dataset fashion-mnist --limit 5000
#   python examples/retrieval.py runs/fashion-mnist --dataset ./photos --image ./query.jpg \
#       --save-index idx.safetensors
#   accelerate launch examples/retrieval.py runs/fashion-mnist ...   (encodes the database on every process)
# The command-line equivalent is `mecoq index build ...` followed by `mecoq search ...`.
# ##################################################################################################
from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from PIL import Image

from mecoq_hf import MeCoQModel
from mecoq_hf.data.loaders import make_eval_dataloader
from mecoq_hf.data.sources import load_image_dataset
from mecoq_hf.data.transforms import build_eval_transform
from mecoq_hf.encoding import encode_dataset
from mecoq_hf.retrieval.index import CodeIndex


def build_index(model, database, accelerator, batch_size):
    """Encode the database (hard codes) and index it under its `index` column."""
    transform = build_eval_transform(model.backbone.data_config)
    loader = make_eval_dataloader(database, transform, batch_size)
    encoded = encode_dataset(model, loader, accelerator, method="encode")  # codes (N, M), ids (N,)
    index = CodeIndex.from_model(model)  # the model's codebooks and its config's scoring
    index.add(encoded.outputs, ids=encoded.ids)
    return index


def search(model, index, image, top_k):
    """The top_k (ids, scores) of one PIL image."""
    pixel_values = build_eval_transform(model.backbone.data_config)(image)[None]  # (1, 3, H, W)
    with torch.no_grad():
        query = model.embed(pixel_values.to(next(model.parameters()).device))  # (1, d)
    scores, ids = index.search(query, k=top_k)
    return ids[0].tolist(), scores[0].tolist()


def main():
    parser = argparse.ArgumentParser(
        description="Index a dataset with a MeCoQ model and search it with one image."
    )
    parser.add_argument("model_dir", help="a saved MeCoQ model folder")
    parser.add_argument(
        "--dataset", default="fashion-mnist", help="fashion-mnist, an image folder or a save_to_disk folder"
    )
    parser.add_argument(
        "--split", default=None, help="split of a multi-split source (fashion-mnist: train or test)"
    )
    parser.add_argument("--limit", type=int, default=5000, help="index only the first N images")
    parser.add_argument("--image", default=None, help="query image (default: the first image not indexed)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--save-index", default=None, help="also write the index (safetensors)")
    args = parser.parse_args()

    accelerator = Accelerator()
    model = MeCoQModel.from_pretrained(args.model_dir, dtype=torch.float32).eval().to(accelerator.device)
    with accelerator.main_process_first():
        images = load_image_dataset(args.dataset, split=args.split)
    database = images.select(range(min(args.limit, len(images))))
    index = build_index(model, database, accelerator, args.batch_size)
    if args.save_index and accelerator.is_main_process:
        index.save(args.save_index)

    if args.image is not None:
        query, query_label = Image.open(args.image), None
    else:  # the first image after the indexed ones (held out), or the first one when all are indexed
        row = images[len(database) % len(images)]
        query, query_label = row["image"], row.get("label")
    ids, scores = search(model, index, query, args.top_k)

    names = database.features["label"].names if "label" in database.features else None
    label_of = dict(zip(database["index"], database["label"])) if "label" in database.column_names else {}
    query_name = args.image or f"row {len(database) % len(images)} of {args.dataset}"
    query_class = f" ({names[query_label]})" if names and query_label is not None else ""
    accelerator.print(f"{index}\nquery: {query_name}{query_class}")
    for rank, (item, score) in enumerate(zip(ids, scores), start=1):
        label = label_of.get(item)
        label_name = names[label] if names and label is not None else ""
        accelerator.print(f"{rank:>3}. id {item:>6}  score {score:8.4f}  {label_name}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
