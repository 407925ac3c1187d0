"""Command-line tools and tritonserver around the engine: textgen-launcher, the `textgen` CLI,
finding and supervising tritonserver, rendering the model repository, logging setup."""
