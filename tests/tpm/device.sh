#!/usr/bin/env bash
# device.sh: the device side of DPS TPM attestation (dps-protocol.md §3.4), driven through
# tpm2-tools against a TPM reachable through $TPM2TOOLS_TCTI (a swtpm in the tests). It does
# what the Azure C SDK's TPM HSM (hsm_client_tpm.c) does, with the same persistent handles.
#
# Usage: device.sh STATE_DIR COMMAND [ARG]
#
#   init            Ensure the endorsement key (EK, 0x81010001, the standard RSA-2048 EK
#                   template) and the storage root key (SRK, 0x81000001, RSA-2048 AES-128-CFB,
#                   restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|
#                   noda) exist as persistent objects (existing ones are kept), then write
#                   STATE_DIR/ek.b64 and STATE_DIR/srk.b64 (base64 of the TPM2B_PUBLIC: the
#                   `endorsementKey` / `storageRootKey` of the registration request) and
#                   STATE_DIR/registration_id (the C SDK's default: lower-case unpadded
#                   base32 of SHA-256 over the EK TPM2B_PUBLIC). Prints nothing.
#   import BLOB     Take the `authenticationKey` (base64) from a DPS answer, split it into its
#                   fields (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET, TPM2B_PRIVATE,
#                   TPM2B_ENCRYPTED_SECRET, TPM2B_PUBLIC, optional u16-sized trailer), then
#                   TPM2_ActivateCredential (activate = SRK, key = EK under a
#                   PolicySecret(ENDORSEMENT) session) to recover the inner wrapper key,
#                   TPM2_Import under the SRK, TPM2_Load, and TPM2_EvictControl the HMAC key to
#                   0x81000100, replacing any key already there. Prints nothing.
#   sign STRING     Print base64(HMAC-SHA256(key, STRING)), computed inside the TPM with the
#                   persistent key at 0x81000100 (TPM2_HMAC). STRING is used byte for byte
#                   (for a SAS token: "<url-encoded resource>\n<expiry>").
#
# Environment: TPM2TOOLS_TCTI (required), e.g. "swtpm:host=127.0.0.1,port=2321". The caller
# starts the TPM, e.g.
#   swtpm socket --tpm2 --tpmstate dir=DIR --server type=tcp,port=P,bindaddr=127.0.0.1 \
#     --ctrl type=tcp,port=P+1,bindaddr=127.0.0.1 --flags not-need-init,startup-clear
#
# Needs tpm2-tools (5.x) and coreutils; scripts/test installs swtpm, swtpm-tools and
# tpm2-tools. There is no resource manager in front of swtpm, so every step flushes the
# transient objects and sessions it leaves behind (otherwise the TPM runs out of object
# slots: "out of memory for object contexts").
#
# Exit status: 0 on success, 2 on usage errors, otherwise that of the failing tool (its
# message is on stderr).

set -euo pipefail

readonly EK_HANDLE=0x81010001
readonly SRK_HANDLE=0x81000001
readonly KEY_HANDLE=0x81000100
readonly SRK_ATTRIBUTES='restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda'

die() {
    echo "device.sh: $*" >&2
    exit 2
}

usage() {
    die "usage: device.sh STATE_DIR {init | import AUTHENTICATION_KEY_B64 | sign STRING}"
}

[[ $# -ge 2 ]] || usage
readonly STATE=$1
readonly COMMAND=$2
shift 2

[[ -n ${TPM2TOOLS_TCTI:-} ]] || die "TPM2TOOLS_TCTI is not set (e.g. swtpm:host=127.0.0.1,port=2321)"
for tool in tpm2_createek tpm2_createprimary tpm2_evictcontrol tpm2_readpublic tpm2_getcap \
    tpm2_flushcontext tpm2_startauthsession tpm2_policysecret tpm2_activatecredential \
    tpm2_import tpm2_load tpm2_hmac od base64 sha256sum base32; do
    command -v "$tool" >/dev/null || die "$tool not found: install tpm2-tools (scripts/test does)"
done
mkdir -p "$STATE"

# Flush transient objects and loaded sessions left in the TPM.
flush() {
    tpm2_flushcontext -t >/dev/null 2>&1 || true
    tpm2_flushcontext -s >/dev/null 2>&1 || true
}

# Whether a persistent handle is in use. (Not `tpm2_getcap | grep -q`: with pipefail, grep
# exiting at the first match can fail the pipeline through SIGPIPE.)
persistent() {
    local handles
    handles=$(tpm2_getcap handles-persistent)
    grep -qix -- "- $1" <<<"$handles"
}

# The big-endian u16 at byte offset $2 of file $1.
u16_at() {
    od -An -tu2 --endian=big -j "$2" -N 2 "$1" | tr -d ' \n'
}

cmd_init() {
    [[ $# -eq 0 ]] || usage
    flush
    if ! persistent "$EK_HANDLE"; then
        tpm2_createek -c "$EK_HANDLE" -G rsa -u "$STATE/ek.pub" -f tss >/dev/null
        flush
    fi
    if ! persistent "$SRK_HANDLE"; then
        tpm2_createprimary -Q -C o -G rsa2048:aes128cfb -g sha256 -a "$SRK_ATTRIBUTES" \
            -c "$STATE/srk.ctx"
        tpm2_evictcontrol -Q -C o -c "$STATE/srk.ctx" "$SRK_HANDLE"
        rm -f "$STATE/srk.ctx"
        flush
    fi
    tpm2_readpublic -Q -c "$EK_HANDLE" -o "$STATE/ek.pub"
    tpm2_readpublic -Q -c "$SRK_HANDLE" -o "$STATE/srk.pub"
    base64 -w0 "$STATE/ek.pub" >"$STATE/ek.b64"
    base64 -w0 "$STATE/srk.pub" >"$STATE/srk.b64"
    # base32 of the raw digest: turn sha256sum's hex back into bytes with printf.
    local hex bytes="" i
    hex=$(sha256sum "$STATE/ek.pub" | cut -d' ' -f1)
    for ((i = 0; i < ${#hex}; i += 2)); do
        bytes+="\\x${hex:i:2}"
    done
    printf '%b' "$bytes" | base32 -w0 | tr -d '=' | tr 'A-Z' 'a-z' >"$STATE/registration_id"
}

cmd_import() {
    [[ $# -eq 1 ]] || usage
    local dir="$STATE/import"
    rm -rf "$dir"
    mkdir -p "$dir"
    printf '%s' "$1" | base64 -d -i >"$dir/blob" 2>/dev/null ||
        die "the authentication key is not valid base64"

    # Split into T2B fields: 1 id object, 2 credential seed, 3 duplicate, 4 import seed,
    # 5 public area, 6 optional trailer (DPS sends u16(len) + bytes, ignored here).
    local total offset=0 i size
    total=$(stat -c %s "$dir/blob")
    for i in 1 2 3 4 5 6; do
        if [[ $i -eq 6 && $offset -eq $total ]]; then
            break
        fi
        ((offset + 2 <= total)) || die "the authentication key is truncated in field $i"
        size=$(u16_at "$dir/blob" "$offset")
        ((offset + 2 + size <= total)) || die "the authentication key is truncated in field $i"
        tail -c +"$((offset + 1))" "$dir/blob" | head -c "$((2 + size))" >"$dir/field$i"
        offset=$((offset + 2 + size))
    done
    ((offset == total)) || die "$((total - offset)) unexpected bytes after the authentication key"

    # tpm2_activatecredential's input: magic, version, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
    {
        printf '\xba\xdc\xc0\xde\x00\x00\x00\x01'
        cat "$dir/field1" "$dir/field2"
    } >"$dir/credential"

    flush
    tpm2_startauthsession -Q --policy-session -S "$dir/session.ctx"
    tpm2_policysecret -Q -S "$dir/session.ctx" -c e
    tpm2_activatecredential -Q -c "$SRK_HANDLE" -C "$EK_HANDLE" -i "$dir/credential" \
        -o "$dir/inner.key" -P "session:$dir/session.ctx"
    tpm2_flushcontext "$dir/session.ctx"
    flush

    tpm2_import -Q -C "$SRK_HANDLE" -u "$dir/field5" -i "$dir/field3" -s "$dir/field4" \
        -k "$dir/inner.key" -r "$dir/key.priv"
    flush
    tpm2_load -Q -C "$SRK_HANDLE" -u "$dir/field5" -r "$dir/key.priv" -c "$dir/key.ctx"
    if persistent "$KEY_HANDLE"; then
        tpm2_evictcontrol -Q -C o -c "$KEY_HANDLE"
    fi
    tpm2_evictcontrol -Q -C o -c "$dir/key.ctx" "$KEY_HANDLE"
    flush
    rm -rf "$dir"
}

cmd_sign() {
    [[ $# -eq 1 ]] || usage
    flush
    printf '%s' "$1" >"$STATE/sign.in"
    tpm2_hmac -c "$KEY_HANDLE" -g sha256 -o "$STATE/sign.out" "$STATE/sign.in"
    base64 -w0 "$STATE/sign.out"
    echo
    rm -f "$STATE/sign.in" "$STATE/sign.out"
}

case $COMMAND in
init) cmd_init "$@" ;;
import) cmd_import "$@" ;;
sign) cmd_sign "$@" ;;
*) usage ;;
esac
