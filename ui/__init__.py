"""The AMC search page: whole-store search with the model's explanations, in a browser (``amc-ui``, ``make ui``).

``app`` is the HTTP server (Python's ``http.server``, no framework), ``answers`` what a search returns to the
page, ``static/`` the page itself (plain HTML, JavaScript and CSS, nothing from the internet), ``browser`` drives
headless Chromium for the tests and ``report`` measures the page (``make ui-report``). The app talks to Triton only
through :class:`amc_client.AMCClient`; nothing here imports torch.
"""
