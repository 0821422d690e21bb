import Crypto

/// PostgreSQL's md5 password scheme.
public enum MD5Auth {
    public static func hex(_ bytes: some Sequence<UInt8>) -> String {
        let digits: [Character] = Array("0123456789abcdef")
        var s = ""
        for b in bytes {
            s.append(digits[Int(b >> 4)])
            s.append(digits[Int(b & 0x0F)])
        }
        return s
    }

    static func md5Hex(_ bytes: [UInt8]) -> String {
        hex(Insecure.MD5.hash(data: bytes))
    }

    /// The stored form: "md5" + md5(password + user).
    public static func storedSecret(password: String, user: String) -> String {
        "md5" + md5Hex(Array(password.utf8) + Array(user.utf8))
    }

    /// What the client sends for a stored secret and salt: "md5" + md5(md5hex(password + user) + salt).
    public static func response(storedSecret: String, salt: [UInt8]) -> String {
        "md5" + md5Hex(Array(storedSecret.utf8.dropFirst(3)) + salt)
    }

    public static func response(password: String, user: String, salt: [UInt8]) -> String {
        response(storedSecret: storedSecret(password: password, user: user), salt: salt)
    }
}
