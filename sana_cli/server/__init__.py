"""`sana serve`: the HTTP routes, the OpenAI images mapping, the work queue, and the attached client."""
