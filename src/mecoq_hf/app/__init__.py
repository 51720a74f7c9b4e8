"""The search page of a MeCoQ model and its code index (gradio), locally or as a Hugging Face Space.

    mecoq app runs/fmnist --index runs/fmnist/index.safetensors        # http://127.0.0.1:7860
    mecoq push-app user/mecoq-fmnist user/mecoq-fmnist-search --index runs/fmnist/index.safetensors

- `search`: everything the page takes from the rest of the package (model, index, images, headline numbers);
  no gradio.
- `page`: `build_page` (the gradio Blocks), `launch_page` (serve it on 127.0.0.1), `SearchPage` (the request
  logic without a browser).
- `space`: `write_space` (app.py, README.md with the Space front matter, requirements.txt, the index) and
  `push_space` (upload them to a Space repo).

gradio is an optional dependency (`pip install "mecoq-hf[app]"`): only `page` imports it, so this package,
`search` and `space` import without it (a Space is written and pushed without gradio installed).
"""
