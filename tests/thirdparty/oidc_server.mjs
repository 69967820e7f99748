// A real, third-party OpenID Provider (panva/oidc-provider) for the gateway's interop tests.
//
// Why: our fake authorization server encodes *our* reading of RFC 6749/7636/7009; this one
// encodes someone else's (a certified implementation), so the two disagreeing is a finding.
//
// Usage:  node oidc_server.mjs [PORT]      (PORT, or env OIDC_PORT; 0 = pick a free port)
// The first line on stdout is `LISTENING http://127.0.0.1:PORT` (the issuer); stdout carries
// nothing else (the library's notices are sent to stderr). SIGTERM/SIGINT stop it cleanly.
//
// Environment:
//   OIDC_CLIENTS            JSON array of client metadata (RFC 7591 names), passed through as-is;
//                           defaults: grant_types [authorization_code, refresh_token],
//                           response_types [code], scope "openid offline_access email".
//   OIDC_ACCESS_TOKEN_TTL   seconds (default 300), also used for client_credentials tokens.
//   OIDC_REFRESH_TOKEN_TTL  seconds (default 86400).
//   OIDC_ROTATE_REFRESH     "0" turns refresh-token rotation off (default on).
//   OIDC_ACCOUNT_CLAIMS     JSON object of extra claims for every account (default: email).
//
// Policy (chosen to match what the gateway must cope with):
//   - PKCE is required for every client (only S256 exists in oidc-provider 9).
//   - A refresh token is issued for every authorization_code grant of a client allowed the
//     refresh_token grant (offline_access is not needed), and it does not die with the
//     browser session: the gateway holds tokens long after the user closed the tab.
//   - Refresh tokens rotate on every use; replaying an old one fails with invalid_grant.
//   - Revocation (RFC 7009), introspection (RFC 7662), userinfo and client_credentials on.
//   - Development interactions: /interaction/:uid serves plain HTML login and consent forms
//     (any login name is accepted as the account id; the password is ignored).
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import process from 'node:process';

// The library prints notices with console.info (stdout); stdout is reserved for LISTENING.
console.info = console.error;
console.log = console.error;

const { default: Provider } = await import('oidc-provider');

function envInt(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n <= 0) {
    throw new Error(`${name} must be a positive whole number of seconds`);
  }
  return n;
}

function envJson(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  try {
    return JSON.parse(raw);
  } catch {
    throw new Error(`${name} is not valid JSON`);
  }
}

const DEFAULT_CLIENTS = [{
  client_id: 'gateway',
  client_secret: 'gateway-secret',
  redirect_uris: ['http://127.0.0.1:9/callback'],
  token_endpoint_auth_method: 'client_secret_basic',
}];

function clientMetadata(raw) {
  if (!Array.isArray(raw) || raw.length === 0) {
    throw new Error('OIDC_CLIENTS must be a non-empty JSON array of client objects');
  }
  return raw.map((c) => ({
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    scope: 'openid offline_access email',
    ...c,
  }));
}

const port = Number(process.argv[2] ?? process.env.OIDC_PORT ?? 0);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  throw new Error('port must be a whole number between 0 and 65535');
}
const accessTtl = envInt('OIDC_ACCESS_TOKEN_TTL', 300);
const refreshTtl = envInt('OIDC_REFRESH_TOKEN_TTL', 86400);
const rotate = process.env.OIDC_ROTATE_REFRESH !== '0';
const clients = clientMetadata(envJson('OIDC_CLIENTS', DEFAULT_CLIENTS));
const extraClaims = envJson('OIDC_ACCOUNT_CLAIMS', null);

// The issuer must be known before the Provider exists, and with port 0 it is only known
// once the socket is bound: bind first, attach the provider's handler afterwards.
const server = createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, '127.0.0.1', resolve);
});
const issuer = `http://127.0.0.1:${server.address().port}`;

const signingKey = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey
  .export({ format: 'jwk' });

const provider = new Provider(issuer, {
  clients,
  jwks: { keys: [{ ...signingKey, kid: 'test-rs256', alg: 'RS256', use: 'sig' }] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  scopes: ['openid', 'offline_access', 'email'],
  claims: { openid: ['sub'], email: ['email', 'email_verified'] },
  async findAccount(_ctx, sub) {
    return {
      accountId: sub,
      async claims() {
        return {
          sub, email: `${sub}@example.test`, email_verified: true, ...(extraClaims ?? {}),
        };
      },
    };
  },
  pkce: { required: () => true },
  // Called for the authorization_code grant (rotation on refresh is rotateRefreshToken's job).
  issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
  expiresWithSession: async () => false,
  rotateRefreshToken: () => rotate,
  ttl: {
    AccessToken: accessTtl,
    ClientCredentials: accessTtl,
    RefreshToken: refreshTtl,
    AuthorizationCode: 60,
    IdToken: 3600,
    Interaction: 600,
    Session: 3600,
    Grant: refreshTtl,
  },
  features: {
    devInteractions: { enabled: true },
    revocation: { enabled: true },
    introspection: { enabled: true },
    clientCredentials: { enabled: true },
    userinfo: { enabled: true },
    rpInitiatedLogout: { enabled: false },
  },
  // Errors as JSON, so a failing test shows why instead of an HTML page.
  async renderError(ctx, out) {
    ctx.type = 'json';
    ctx.body = out;
  },
});
provider.on('server_error', (_ctx, err) => console.error('server_error', err));

server.on('request', provider.callback());

function stop() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

process.stdout.write(`LISTENING ${issuer}\n`);
