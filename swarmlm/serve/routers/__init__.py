"""The HTTP routes of a serving peer, one router per endpoint family; each hands its request to the app's
`OpenAIServing` (serve/serving.py)."""
