"""Serving a base, its library's experts and routers over them: `engine.Engine` (models and scheduler) behind the
OpenAI-compatible FastAPI application of `app.create_app`, run by `phatgoose serve`. `scheduler` batches
requests (scoring rows per batch, decoding per step in `slots.SlotDecoder`); `live_library` serves every
per-token router over a library in one program whose experts change while serving."""
