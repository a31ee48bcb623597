// A real OpenID Connect provider (panva's oidc-provider, OpenID Certified) for tests/directory:
//   node oidc_provider.mjs PORT CLIENT_ID CLIENT_SECRET REDIRECT_URI USERS_JSON [ID_TOKEN_TTL_S]
// USERS_JSON maps an account id to its claims, e.g. {"alice": {"groups": ["payments-devs"]}}.
// Sign-in uses the provider's own development interactions (a login form that accepts any
// password for a listed account, then a consent form), driven by the tests over HTTP.
import Provider from 'oidc-provider';

const [port, clientId, secret, redirect, usersJson, ttl] = process.argv.slice(2);
const users = JSON.parse(usersJson);
const issuer = `http://127.0.0.1:${port}`;
const provider = new Provider(issuer, {
  clients: [{
    client_id: clientId, client_secret: secret, redirect_uris: [redirect],
    grant_types: ['authorization_code'], response_types: ['code'],
  }],
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
  features: { devInteractions: { enabled: true } },
});
provider.listen(Number(port), '127.0.0.1', () => console.log(`ready ${issuer}`));
