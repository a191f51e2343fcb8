"""Request inputs: untrusted bytes in, the model's input tensors out, on the front's CPUs.

It owns:
  - `images`: decoding, validating and resizing every image, for every protocol alike;
  - `preprocessing`: the checkpoint's processor (chat template, tokens, image patches);
  - `chat_template`: which messages the checkpoint's template would silently drop;
  - `image_workers`: the threads that do image work below the event loop's priority;
  - `guides`: guided decoding's guides (JSON schema, regex, choices, EBNF) checked and compiled
    with xgrammar, cached, and read back on the engine's side of the process boundary;
  - `image_urls` and `addresses`: fetching an `image_url` under the server's network rules.

It may import the contract (`predictor.errors`, `params`, `protocol`, `rows`, `settings`) and
nothing else of the predictor: the engine, the model and the servers all build on it.
"""
