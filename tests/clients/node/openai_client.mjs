// openai-js against a codemoat server: completion with a suffix, streamed chat, models.retrieve.
// Usage: CODEMOAT_URL=... CODEMOAT_TOKEN=... CODEMOAT_MODEL=... node openai_client.mjs; prints one JSON object.
import OpenAI from "openai";

const model = process.env.CODEMOAT_MODEL;
const client = new OpenAI({ baseURL: `${process.env.CODEMOAT_URL}/v1`, apiKey: process.env.CODEMOAT_TOKEN, maxRetries: 0 });
const out = {};
const c = await client.completions.create({ model, prompt: "def add(a, b):\n    return ", suffix: "\n", max_tokens: 16, temperature: 0 });
out.completion = { text: c.choices[0].text, finish_reason: c.choices[0].finish_reason, usage: c.usage };
const stream = await client.chat.completions.create({
  model, messages: [{ role: "user", content: "What does os.path.join do?" }], stream: true, temperature: 0, max_tokens: 24,
});
const pieces = [];
let finish = null;
for await (const chunk of stream) {
  if (chunk.choices.length) {
    pieces.push(chunk.choices[0].delta.content ?? "");
    finish = chunk.choices[0].finish_reason ?? finish;
  }
}
out.chat = { pieces: pieces.length, text: pieces.join(""), finish_reason: finish };
out.retrieve = await client.models.retrieve(model);
try {
  await client.models.retrieve("gpt-4o");
  out.retrieve_unknown = "found";
} catch (e) {
  out.retrieve_unknown = { status: e.status, code: e.code, type: e.type, name: e.constructor.name };
}
try {
  await client.chat.completions.create({ model, messages: [{ role: "wizard", content: "x" }] });
  out.bad_role = "accepted";
} catch (e) {
  out.bad_role = { status: e.status, code: e.code, param: e.param, type: e.type };
}
console.log(JSON.stringify(out));
