from mtop import passwords


def test_legacy_vectors(vectors):
    for case in vectors["password_hash_legacy"]["cases"]:
        assert passwords.legacy_hash(case["salt"], case["password"]) == case["hash"]
        assert passwords.verify(case["hash"], case["salt"], case["password"])
        assert not passwords.verify(case["hash"], case["salt"], case["password"] + "x")
        assert not passwords.verify(case["hash"], case["salt"] + "x", case["password"])


def test_empty_stored_password_never_authenticates():
    assert not passwords.verify("", "salt", "")
    assert not passwords.verify("", "", "anything")


def test_scrypt_round_trip_and_format():
    stored = passwords.scrypt_hash("pässwörd", log2_n=10)
    assert stored.startswith("$scrypt$ln=10,r=8,p=1$")
    assert len(stored) <= 1024
    assert passwords.is_expensive(stored)
    assert passwords.verify(stored, "ignored-salt", "pässwörd")
    assert not passwords.verify(stored, "ignored-salt", "passwörd")


def test_two_hashes_of_one_password_differ():
    assert passwords.scrypt_hash("x", log2_n=4) != passwords.scrypt_hash("x", log2_n=4)


def test_malformed_scrypt_values_never_match():
    for bad in ("$scrypt$", "$scrypt$ln=99,r=8,p=1$AAAA$AAAA", "$scrypt$ln=4,r=8,p=1$!!$AAAA", "$scrypt$ln=4$a$b"):
        assert not passwords.verify(bad, "", "x")


def test_new_salt_fits_the_column():
    salt = passwords.new_salt()
    assert len(salt) <= 32 and salt.isalnum()
