"""`sana serve`: the routes, the OpenAI images mapping, the attach protocol shared with the client (wire),
the work queue, and the attached client."""
