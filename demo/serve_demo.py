"""Demo step 10: what an editor sees, through the official `openai` client and Continue's Ollama request."""

import json
import sys
import time

import httpx
import openai

url, token = sys.argv[1], sys.argv[2]
scraper = sys.argv[3] if len(sys.argv) > 3 else None


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m")


def show(code: str, color: str = "32") -> None:
    for line in code.splitlines() or [""]:
        print(f"   │ \033[{color}m{line}\033[0m")


client = openai.OpenAI(base_url=f"{url}/v1", api_key=token)
prefix = (
    'import os\n\n\ndef read_lines(path):\n    """Return the lines of a text file."""\n    with open(path) as f:\n        return '
)
suffix = "\n\n\ndef main():\n    print(read_lines('setup.cfg'))\n"
say("developer (OpenAI client): fill in the middle — prompt + suffix, the server applies the model's FIM template")
t = time.perf_counter()
raw = client.completions.with_raw_response.create(
    model="codemoat-tiny", prompt=prefix, suffix=suffix, max_tokens=24, temperature=0, stop=["\n"]
)
c = raw.parse()
dt = time.perf_counter() - t
if raw.headers.get("x-codemoat-suffix") == "dropped":  # the model has no FIM tokens: say so, as the server does
    print("   (this model has no fill-in-the-middle tokens: the server used the prefix only and said so in X-Codemoat-Suffix)")
show("\n".join(prefix.splitlines()[:-1]), "2")
show(prefix.splitlines()[-1] + c.choices[0].text)
show(suffix.strip("\n"), "2")
print(f"   ({c.usage.completion_tokens} tokens in {dt * 1000:.0f} ms, finish_reason={c.choices[0].finish_reason})")

say("developer types on: the next keystroke resends the file, and the server reads only what changed")
t = time.perf_counter()
c2 = client.completions.create(
    model="codemoat-tiny", prompt=prefix + "f", suffix=suffix, max_tokens=24, temperature=0, stop=["\n"]
)
dt = time.perf_counter() - t
cached = c2.usage.prompt_tokens_details.cached_tokens if c2.usage.prompt_tokens_details else None
print(
    f"   {c2.usage.prompt_tokens} prompt tokens, {cached} of them found in this user's own cache "
    f"(usage.prompt_tokens_details.cached_tokens; another user's request never finds them): {dt * 1000:.0f} ms"
)

if scraper:
    say("developer types on in a longer file: the server tokenises only the prefix's new end")
    long_file = open(__file__).read()  # this file: ~900 characters of it fit the bundled model's 512-token context
    t = time.perf_counter()
    for i in range(8):  # eight keystrokes, three characters each
        client.completions.create(model="codemoat-tiny", prompt=long_file[: 880 + 3 * i], max_tokens=4, temperature=0)
    dt = time.perf_counter() - t
    m = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {scraper}"}).text
    grown = {
        line.split('how="')[1].split('"')[0]: float(line.split()[-1])
        for line in m.splitlines()
        if line.startswith("codemoat_tokenizer_long_texts_total{")
    }
    print(
        f"   8 keystrokes in {dt * 1000:.0f} ms; /metrics codemoat_tokenizer_long_texts_total: "
        f"{grown.get('grown', 0):.0f} grown from this user's last text, {grown.get('whole', 0):.0f} tokenised whole"
    )

say("developer (OpenAI client): streamed chat")
stream = client.chat.completions.create(
    model="codemoat-tiny",
    stream=True,
    max_tokens=60,
    temperature=0.2,
    messages=[{"role": "user", "content": "Write a Python function that returns the size of a file."}],
)
sys.stdout.write("   │ ")
n = 0
for ch in stream:
    if ch.choices and ch.choices[0].delta.content:
        n += 1
        sys.stdout.write(ch.choices[0].delta.content.replace("\n", "\n   │ "))
        sys.stdout.flush()
print(f"\n   ({n} streamed chunks)")

say("Continue's tab-autocomplete (Ollama API): /api/show, then /api/generate with suffix and raw")
h = {"Authorization": f"Bearer {token}"}
show_r = httpx.post(f"{url}/api/show", json={"name": "codemoat-tiny"}, headers=h).json()
print(f"   /api/show template has .Suffix → FIM enabled: {'.Suffix' in show_r['template']}")
body = {
    "model": "codemoat-tiny",
    "prompt": "def is_even(n):\n    return ",
    "suffix": "\n",
    "raw": True,
    "stream": True,
    "options": {"temperature": 0.01, "num_predict": 16, "stop": ["\n"]},
}
text = []
with httpx.stream("POST", f"{url}/api/generate", json=body, headers=h, timeout=60) as r:
    for line in r.iter_lines():
        if line:
            ev = json.loads(line)
            text.append(ev.get("response", ""))
show("def is_even(n):\n    return " + "".join(text))
