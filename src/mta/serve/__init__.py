"""Serving many personalized users from one base model: a persistent user store, per-row batched LoRA
generation (`batched`), and the HTTP server (`app`, needs the `serve` extra: fastapi + uvicorn)."""
