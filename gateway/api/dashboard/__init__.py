"""The dashboard: web pages for people on the admin listener (``GET /`` and ``/dashboard/...``).

`resource.Dashboard` routes and checks who is asking; `signin` keeps the
signed-in browsers and throttles sign-in; `actions` is what each page shows and
each form does, through the JSON API's handlers; `pages` renders HTML with
`twisted.web.template` (`network` the network page, and gathers what it
shows); `web` makes the HTTP answers and their headers; `assets` serves
``static/``.
"""
