// A real OpenID Connect provider (panva's oidc-provider, OpenID Certified) for tests/directory:
//   node oidc_provider.mjs PORT CLIENT_ID CLIENT_SECRET REDIRECT_URIS USERS_JSON [ID_TOKEN_TTL_S] [nodevice]
// REDIRECT_URIS: one or more, comma-separated. USERS_JSON maps an account id to its claims, e.g.
// {"alice": {"groups": ["payments-devs"]}}. The device flow (RFC 8628, /device pages) is on unless
// `nodevice` is given. A second client, "other-app" (same secret and redirects), stands for another
// application at the same provider (its tokens are for another audience).
// Sign-in uses the provider's own development interactions (a login form that accepts any
// password for a listed account, then a consent form), driven by the tests over HTTP.
// OIDC_ED25519=1: the provider signs ID tokens with a fresh Ed25519 key ("alg": "EdDSA" in their header, the
// only name oidc-provider 8 has for it) and publishes that key alone, labelled "EdDSA"; unset: its own RS256 keys.
import { generateKeyPairSync } from 'node:crypto';
import Provider from 'oidc-provider';

const [port, clientId, secret, redirect, usersJson, ttl, device] = process.argv.slice(2);
const grants = ['authorization_code', ...(device === 'nodevice' ? [] : ['urn:ietf:params:oauth:grant-type:device_code'])];
const ed25519 = process.env.OIDC_ED25519;
const client = (id) => ({
  client_id: id, client_secret: secret, redirect_uris: redirect.split(','),
  grant_types: grants, response_types: ['code'], client_name: id,
  ...(ed25519 ? { id_token_signed_response_alg: 'EdDSA' } : {}),
});
const edKey = () => {
  const jwk = generateKeyPairSync('ed25519').privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: 'ed-1', use: 'sig', alg: 'EdDSA' };
};
const users = JSON.parse(usersJson);
const issuer = `http://127.0.0.1:${port}`;
const provider = new Provider(issuer, {
  clients: [client(clientId), client('other-app')],
  ...(ed25519 ? { jwks: { keys: [edKey()] } } : {}),
  claims: { openid: ['sub'], profile: ['name', 'preferred_username'], groups: ['groups'] },
  scopes: ['openid', 'profile', 'groups'],
  pkce: { required: () => true },
  ttl: { IdToken: Number(ttl || 3600) },
  conformIdTokenClaims: false, // the groups claim goes into the id token itself
  findAccount: async (ctx, id) => (users[id] ? {
    accountId: id,
    claims: async () => ({ sub: id, name: id, preferred_username: id, groups: users[id].groups || [] }),
  } : undefined),
  cookies: { keys: [`test-only-${port}-${Date.now()}`] },
  features: { devInteractions: { enabled: true }, deviceFlow: { enabled: device !== 'nodevice' } },
});
provider.listen(Number(port), '127.0.0.1', () => console.log(`ready ${issuer}`));
