"""The web page (`ldm serve`): Gradio UI over the pipelines."""
